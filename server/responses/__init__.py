"""`POST /v1/responses`: OpenAI's Responses API on every target, statelessly.

    request     the body checked (OpenAI's vendored schema, then what the plane can serve) and its chat
                completions form, made once per request
    answer      a whole chat completion -> a Response object
    stream      a chat completion chunk stream -> the Responses event stream; a stored Response -> its events
    dialect     what the relay asks of a /v1/responses request: each attempt sent as its target needs (relayed
                as is to a provider that speaks the Responses API, translated for the rest), and the Responses
                events read back for accounting, framing, failure and the cache

Stateless: the plane stores no responses, so `previous_response_id`, `store: true`, `conversation`, `background`,
`prompt` (a stored template) and `item_reference` inputs are refused with a 400 that says so; a client sends the
whole conversation in `input` each time, as the Agents SDK and coding agents do with `store: false`. An absent
`store` is taken as false (OpenAI's default is true, but a plane that stores nothing cannot honour it), and a
relayed request goes upstream with `store: false`, so the provider keeps nothing either.
"""
