"""RabbitMQ: the worker's own AMQP 0-9-1 connection (protocol, link, reader, handshake,
publishing, endpoint), raw properties and tables (frames, tables), aiormq (broker, confirms)."""
