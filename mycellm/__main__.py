"""``python -m mycellm`` runs the command line."""

from mycellm.cli.app import main

main()
