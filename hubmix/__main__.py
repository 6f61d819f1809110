from hubmix.cli import run

run()
