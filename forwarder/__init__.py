"""vLLM Forwarder: one endpoint in front of many vLLM servers, routing to the healthy ones."""
