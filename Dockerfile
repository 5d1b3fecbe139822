# qprobes in a container: the same installation script the README and CI use.
#   docker build -t qprobes .
#   docker run --rm -it qprobes                      # the main job
#   docker run --rm -it qprobes ./scripts/test.sh    # the tests
FROM debian:12
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/qprobes
COPY . .
ENV QPROBES_VENV=/opt/qprobes/.venv
RUN ./scripts/install.sh
CMD ["./scripts/run.sh"]
