from servekit.cli.main import main

main()
