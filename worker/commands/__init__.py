"""Commands beyond ``run``: ``status``, ``trace``, ``dead-letters`` and ``demo``;
``worker/cli.py`` keeps the group and the options."""
