"""What the forwarder knows about the backends: the list and its discovery, the health polls,
this worker's registry of the fleet, ejection, and the load every routing decision weighs."""
