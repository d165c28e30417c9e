#!/bin/sh
# Prints mode, numeric and named owner of what the Dockerfile created, then
# what each USER wrote. Only reads metadata: no setuid bit or privilege needed.
for path in /etc/app/app.conf /etc/app/secret.conf /usr/local/bin/report \
            /data /data/by-app.txt /data/by-svc.txt; do
    stat -c '%n %a %u:%g %U:%G' "$path"
done
cat /data/by-app.txt /data/by-svc.txt /tmp/nobody.txt
