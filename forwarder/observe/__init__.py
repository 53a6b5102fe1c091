"""What the forwarder tells about itself: its metrics, the access log, request ids, and the
status page with its history."""
