from sparsepilot.cli import main

main()
