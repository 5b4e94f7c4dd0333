"""``python -m orchestrator``: the same as the ``mics-export`` command."""

from orchestrator.cli import main

if __name__ == "__main__":
    main()
