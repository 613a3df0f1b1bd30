"""AMQP 0-9-1 on the wire: the worker's own client (``protocol``), properties and
header tables kept as raw bytes (``frames``), connecting and the topology (``broker``)."""
