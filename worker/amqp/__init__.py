"""RabbitMQ: the worker's own AMQP 0-9-1 connection (``protocol`` over ``link``, ``reader``, ``handshake``,
``publishing``), raw properties and tables (``frames``, ``tables``), aiormq for the topology (``broker``)."""
