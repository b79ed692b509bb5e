from quantfoundry.cli import main

main()
