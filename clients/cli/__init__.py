"""The client half of the ``propserve`` command (models, train, predict, versions), one job
per module: main (the parser, running a verb, exit codes), connection, output, spec,
datafiles, and a module per verb group. propserve.cli adds ``serve`` to the same parser.
"""

from propserve.clients.cli.main import Parser, add_client_commands

__all__ = ["Parser", "add_client_commands"]
