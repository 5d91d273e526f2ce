from cocomix_cli.app import main

main()
