# list_modules: the modules this binary was "linked" from
list_modules() {
    echo "linked from: @MODULES@"
}
