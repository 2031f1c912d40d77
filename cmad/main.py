"""``python -m cmad.main``: the daemon's entry point (cmad.daemon.main)."""

from cmad.daemon.main import main

if __name__ == "__main__":
    main()
