# greet NAME: print a greeting
greet() {
    echo "hello from a $1"
}
