"""`python -m worker` is the `prompter-worker` command."""

from worker.cli import main

if __name__ == "__main__":
    main()
