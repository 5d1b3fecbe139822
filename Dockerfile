# qprobes in a container: QEMU, qprobes and the default Linux guest, built
# and cached, through the same installation script the README and CI use
# (which installs Python, QEMU and the rest); qprobes then runs as the
# unprivileged user "qprobes" (TCG needs no /dev/kvm, no root).
#   docker build -t qprobes .
#   docker run --rm qprobes                          # the main job
#   docker run --rm qprobes ./scripts/test.sh        # the tests
#   docker run --rm -v "$PWD/tests:/work/tests" -w /work qprobes pytest tests
FROM debian:12
WORKDIR /opt/qprobes
COPY . .
ENV QPROBES_VENV=/opt/qprobes/.venv \
    QPROBES_CACHE=/opt/qprobes/cache \
    PATH=/opt/qprobes/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN ["./scripts/install.sh", "--guest", "--user", "qprobes"]
USER qprobes
CMD ["./scripts/run.sh"]
