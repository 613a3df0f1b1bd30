"""prompter-worker: ingests Prompter V7 prompt run events from RabbitMQ into PostgreSQL."""

__version__ = "0.1.0"
