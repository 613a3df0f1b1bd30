"""The commands beyond ``run``, one module or package per command group (``status``,
``trace``, ``deadletters``, ``demo``, ``templates_cli``, ``backfill_cli``); ``cli.py`` keeps
the group, ``options`` what every command shares."""
