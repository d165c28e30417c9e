# Last module: run main with the program's arguments.
main "$@"
