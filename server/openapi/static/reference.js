// The API reference: fetches /openapi.json and renders each operation (method, path, security, parameters,
// request body, answers). DOM built with textContent only: nothing from the document is parsed as HTML.
// Schemas are rendered when their <details> is opened, since OpenAI's request schemas are large and recursive.

const METHODS = ["get", "post", "put", "patch", "delete"];
// How deep an opened schema is expanded before "…" (each level opens on demand below that).
const EAGER_DEPTH = 2;

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

// A description's text, its `backticked` parts as <code>: the only markup the document's texts use.
function prose(text) {
  const fragment = document.createDocumentFragment();
  String(text ?? "").split("`").forEach((part, i) => {
    if (part) fragment.append(i % 2 ? el("code", {}, part) : document.createTextNode(part));
  });
  return fragment;
}

function refName(ref) {
  return ref.split("/").pop();
}

function resolve(doc, node) {
  // A local $ref ("#/components/...") to what it points at.
  let target = doc;
  for (const part of node.$ref.replace(/^#\//, "").split("/")) {
    target = target?.[part.replaceAll("~1", "/").replaceAll("~0", "~")];
  }
  return target ?? {};
}

function typeLabel(schema) {
  if (schema === true) return "any";
  if (schema === false) return "never (refused)";
  if (schema.$ref) return refName(schema.$ref);
  if ("const" in schema) return `= ${JSON.stringify(schema.const)}`;
  if (schema.enum) return `one of ${schema.enum.map((v) => JSON.stringify(v)).join(", ")}`;
  const kinds = Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type;
  if (kinds === "array" && schema.items) return `array of ${typeLabel(schema.items)}`;
  if (kinds) return kinds;
  if (schema.anyOf) return "any of";
  if (schema.oneOf) return "one of";
  if (schema.allOf) return "all of";
  return "any";
}

function constraints(schema) {
  if (typeof schema !== "object") return "";
  const said = [];
  for (const key of ["minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minLength", "maxLength",
    "minItems", "maxItems", "pattern", "format"]) {
    if (key in schema) said.push(`${key} ${schema[key]}`);
  }
  if (schema.additionalProperties === false) said.push("no other fields");
  return said.join(", ");
}

// One schema as a nested list; `seen` holds the $refs on the way here, so a recursive schema stops.
function renderSchema(doc, schema, depth, seen) {
  if (schema && schema.$ref) {
    const name = refName(schema.$ref);
    if (seen.has(name)) return el("span", { class: "note" }, `${name} (recursive)`);
    return lazy(name, () => renderSchema(doc, resolve(doc, schema), depth + 1, new Set([...seen, name])), depth);
  }
  if (typeof schema !== "object" || schema === null) return el("span", { class: "type" }, typeLabel(schema));
  const box = el("div", { class: "schema" });
  const head = el("p", {}, el("span", { class: "type" }, typeLabel(schema)));
  const notes = constraints(schema);
  if (notes) head.append(" ", el("span", { class: "note" }, notes));
  if (schema.description) head.append(" — ", prose(schema.description));
  box.append(head);
  if (schema.properties) {
    const required = new Set(schema.required ?? []);
    const list = el("ul", { class: "properties" });
    for (const [name, property] of Object.entries(schema.properties)) {
      const item = el("li", {}, el("code", {}, name), required.has(name) ? el("span", { class: "required" }, " required") : null, " ");
      item.append(renderSchema(doc, property, depth + 1, seen));
      list.append(item);
    }
    box.append(list);
  }
  if (schema.items && typeof schema.items === "object" && (schema.items.properties || schema.items.$ref)) {
    box.append(el("p", { class: "note" }, "items:"), renderSchema(doc, schema.items, depth + 1, seen));
  }
  if (typeof schema.additionalProperties === "object") {
    box.append(el("p", { class: "note" }, "other fields:"), renderSchema(doc, schema.additionalProperties, depth + 1, seen));
  }
  // Conditions: "if" (when the body matches it) "then" (it must match this), and "not".
  for (const key of ["if", "then", "not"]) {
    if (schema[key] !== undefined) box.append(el("p", { class: "note" }, key), renderSchema(doc, schema[key], depth + 1, seen));
  }
  for (const key of ["anyOf", "oneOf", "allOf"]) {
    if (!Array.isArray(schema[key])) continue;
    const list = el("ol", { class: "branches" });
    for (const branch of schema[key]) list.append(el("li", {}, renderSchema(doc, branch, depth + 1, seen)));
    box.append(el("p", { class: "note" }, key), list);
  }
  return box;
}

// A named schema, expanded now when shallow, else when its <details> is opened.
function lazy(name, render, depth) {
  const details = el("details", { class: "ref" }, el("summary", {}, name));
  let rendered = false;
  const fill = () => {
    if (!rendered) {
      rendered = true;
      details.append(render());
    }
  };
  if (depth < EAGER_DEPTH) {
    details.open = true;
    fill();
  } else {
    details.addEventListener("toggle", fill);
  }
  return details;
}

function renderSecurity(doc, operation) {
  const alternatives = operation.security ?? doc.security ?? [];
  if (alternatives.length === 0) return el("p", { class: "security" }, "No credential needed.");
  const schemes = doc.components?.securitySchemes ?? {};
  const list = el("ul", { class: "security" });
  for (const alternative of alternatives) {
    const names = Object.keys(alternative);
    const item = el("li", {});
    names.forEach((name, i) => {
      if (i) item.append(" + ");
      item.append(el("code", {}, name));
      if (schemes[name]?.description) item.append(": ", prose(schemes[name].description));
    });
    list.append(item);
  }
  return el("div", {}, el("h4", {}, "Credentials (any one line)"), list);
}

function renderParameters(doc, parameters) {
  if (!parameters?.length) return null;
  const rows = parameters.map((raw) => {
    const p = raw.$ref ? resolve(doc, raw) : raw;
    return el("tr", {},
      el("td", {}, el("code", {}, p.name)),
      el("td", {}, p.in),
      el("td", {}, p.required ? "yes" : "no"),
      el("td", {}, typeLabel(p.schema ?? {}), " ", el("span", { class: "note" }, constraints(p.schema ?? {}))),
      el("td", {}, prose(p.description)));
  });
  return el("div", {}, el("h4", {}, "Parameters"),
    el("table", {}, el("thead", {}, el("tr", {}, ...["Name", "In", "Required", "Type", "Description"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows)));
}

function renderContent(doc, content) {
  const box = el("div", {});
  for (const [mediaType, media] of Object.entries(content ?? {})) {
    box.append(el("p", { class: "media" }, mediaType));
    if (media.schema) box.append(renderSchema(doc, media.schema, 0, new Set()));
    if (media.example !== undefined) box.append(el("pre", {}, JSON.stringify(media.example, null, 2)));
  }
  return box;
}

function renderBody(doc, operation) {
  const body = operation.requestBody;
  if (!body) return null;
  return el("div", {}, el("h4", {}, body.required ? "Request body (required)" : "Request body"), renderContent(doc, body.content));
}

function renderResponses(doc, operation) {
  const list = el("div", { class: "responses" }, el("h4", {}, "Answers"));
  for (const [status, raw] of Object.entries(operation.responses ?? {})) {
    const response = raw.$ref ? resolve(doc, raw) : raw;
    const details = el("details", { class: `status s${status[0]}` },
      el("summary", {}, el("code", {}, status), " ", prose(response.description), raw.$ref ? el("span", { class: "note" }, ` (${refName(raw.$ref)})`) : null));
    let rendered = false;
    details.addEventListener("toggle", () => {
      if (!rendered) {
        rendered = true;
        details.append(renderContent(doc, response.content));
      }
    });
    list.append(details);
  }
  return list;
}

function renderOperation(doc, path, method, operation) {
  const id = operation.operationId ?? `${method}-${path}`;
  const details = el("details", { class: "operation", id },
    el("summary", {}, el("span", { class: `method ${method}` }, method.toUpperCase()), " ", el("code", { class: "path" }, path), " ",
      el("span", { class: "summary" }, prose(operation.summary))));
  let rendered = false;
  details.addEventListener("toggle", () => {
    if (rendered) return;
    rendered = true;
    if (operation.description) details.append(el("p", {}, prose(operation.description)));
    for (const part of [renderSecurity(doc, operation), renderParameters(doc, operation.parameters), renderBody(doc, operation), renderResponses(doc, operation)]) {
      if (part) details.append(part);
    }
  });
  details.dataset.search = `${method} ${path} ${operation.summary ?? ""} ${(operation.tags ?? []).join(" ")}`.toLowerCase();
  return details;
}

function render(doc) {
  const main = document.getElementById("reference");
  const toc = document.getElementById("toc");
  main.replaceChildren();
  const byTag = new Map((doc.tags ?? []).map((t) => [t.name, []]));
  for (const [path, item] of Object.entries(doc.paths ?? {})) {
    for (const method of METHODS) {
      const operation = item[method];
      if (!operation) continue;
      const tag = operation.tags?.[0] ?? "other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push(renderOperation(doc, path, method, operation));
    }
  }
  main.append(el("p", { class: "note" }, `${doc.info?.title ?? "API"} ${doc.info?.version ?? ""}: ${doc.info?.summary ?? ""}`),
    el("p", {}, prose(doc.info?.description)));
  const links = el("ul", {});
  for (const [tag, operations] of byTag) {
    if (operations.length === 0) continue;
    const anchor = `tag-${tag.replace(/[^a-z0-9]+/gi, "-")}`;
    links.append(el("li", {}, el("a", { href: `#${anchor}` }, `${tag} (${operations.length})`)));
    main.append(el("section", { id: anchor }, el("h2", {}, tag), ...operations));
  }
  toc.replaceChildren(links);
  const target = location.hash && document.getElementById(decodeURIComponent(location.hash.slice(1)));
  if (target && target.tagName === "DETAILS") target.open = true;
}

function filter(query) {
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  for (const operation of document.querySelectorAll("details.operation")) {
    operation.hidden = !words.every((w) => operation.dataset.search.includes(w));
  }
  for (const section of document.querySelectorAll("main section")) {
    section.hidden = [...section.querySelectorAll("details.operation")].every((d) => d.hidden);
  }
}

async function main() {
  const container = document.getElementById("reference");
  try {
    const response = await fetch("/openapi.json", { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`GET /openapi.json answered ${response.status}`);
    render(await response.json());
  } catch (error) {
    container.replaceChildren(el("p", { class: "error", role: "alert" }, `Could not load the document: ${error.message}`));
    return;
  }
  document.getElementById("filter").addEventListener("input", (event) => filter(event.target.value));
}

main();
