"""Policy (server.policy): the response cache, rate limits and quotas."""
