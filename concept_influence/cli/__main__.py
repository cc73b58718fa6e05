"""``python -m concept_influence.cli``: the same as the ``concept-influence`` command."""

from concept_influence.cli import main

main()
