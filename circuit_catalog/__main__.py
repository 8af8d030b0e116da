from circuit_catalog.cli import main

main()
