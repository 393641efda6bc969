from hermetic.cli import main

main()
