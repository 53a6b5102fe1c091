"""Who uses the forwarder and how much: API keys, their limits, and the tokens their answers
used."""
