"""The program's entry point (`tadrop`, `python -m tadrop_cli`), tiny on purpose: the signal handlers are
installed before the imports that take a second, so that an interrupt at any moment exits 130 in one line."""


def main() -> None:
    from .interrupts import install

    install()
    from .cli import main as run_cli

    run_cli()


if __name__ == "__main__":
    main()
