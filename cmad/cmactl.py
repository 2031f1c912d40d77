"""cmactl: placeholder until the command-line client lands."""


def main() -> int:
    raise SystemExit("cmactl: not yet implemented")
