# Package "metadata", sourced by main.sh.
APP_NAME=myapp
APP_VERSION=1.0
