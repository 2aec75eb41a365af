"""The engine's session interface over HTTP: wire format, client, server."""
