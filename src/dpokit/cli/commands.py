"""The commands: one module each, with ``add_command(commands)``.

Each module adds its subparser to the ``dpokit`` parser and sets ``func`` to a function taking the parsed
arguments. Like dpokit.cli.main, a command module imports torch and transformers only inside that function, so that
``--help`` and option errors answer at once.
"""

MODULES = ("train", "eval", "demo", "generate", "merge", "score", "rank", "winrate", "iterate", "reproduce", "reward",
           "push")
"""dpokit.cli.<name> modules, in the order their commands are listed by ``dpokit --help``."""
