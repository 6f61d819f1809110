from hubmix.cli import main

main()
