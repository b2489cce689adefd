"""``python -m mycellm`` runs the command line."""

from mycellm.cli import main

main()
