"""What the tests share besides fixtures: the fakes (a scriptable OpenAI upstream, hostile nodes, proxies
that freeze or cut), and harnesses running the real parts (planes, agents, the agent binary) as processes."""
