"""One `/v1` request, in and out: the view, its body, the brake and the pick of a backend, the
wire to it, and the answer relayed back."""
