# main.sh: the program's entry point. Functions come from modules/*.sh,
# which build.sh appends after this file, so main() is called at the very end.
main() {
    greet "multi-stage build"
    echo "version: @VERSION@"
    list_modules
}
