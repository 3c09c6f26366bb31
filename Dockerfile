# clip-supervisor as a container: Debian's ffmpeg and Python, the package's wheel in a virtual
# environment, a non-root user, and the master as PID 1.
#
#   docker build -t clip-supervisor:0.1.0 .
#   docker run --rm -e CLIP_SUPERVISOR_REDIS_URL=redis://redis:6379/0 clip-supervisor:0.1.0
#
# The master runs in the foreground as PID 1 (exec form, no shell in between): it installs
# handlers for TERM, INT, QUIT, HUP, TTIN, TTOU and USR1 (the kernel drops a signal to PID 1
# that has none), and it reaps every child with waitpid(-1), orphans re-parented to it
# included, so no init shim (tini, dumb-init) is needed. `docker stop` and Kubernetes send
# TERM: jobs in progress finish within [supervisor] graceful_timeout (30 s by default; give
# `docker stop -t` and terminationGracePeriodSeconds more), the rest are requeued.
#
# Both stages use the same Debian release, so the virtual environment made in the first
# (whose python is /usr/bin/python3) runs unchanged in the second. Pin the base image by
# digest (debian:bookworm-slim@sha256:...) in your own build for reproducible images.

FROM debian:bookworm-slim AS build
# Package versions are left to the Debian release (bookworm's security updates included)
# rather than pinned: a pinned version disappears from the archive at its next update.
# gcc builds die-with-parent (worker/die_with_parent.c), the static program the worker starts
# ffmpeg through; the runtime stage needs no compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv gcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The wheel is built from the source tree, then installed with its dependencies into the
# environment that the runtime stage copies; pip's own versions come from that environment.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/clip-supervisor \
    && /opt/clip-supervisor/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/clip-supervisor/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/clip-supervisor/bin/pip install --no-cache-dir /wheels/*.whl \
    && /opt/clip-supervisor/bin/clip-supervisor --help >/dev/null

FROM debian:bookworm-slim
# ffmpeg from Debian (the tests run against the same major version); tzdata for log times.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ffmpeg tzdata \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER, and the
# manifests in etc/kubernetes/ name the same ids.
RUN groupadd --system --gid 10001 clip-supervisor \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/clip-supervisor \
       --no-create-home --shell /usr/sbin/nologin clip-supervisor \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/clip-supervisor
COPY --from=build /opt/clip-supervisor /opt/clip-supervisor
ENV PATH=/opt/clip-supervisor/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/clip-supervisor \
    CLIP_SUPERVISOR_METRICS_LISTEN=0.0.0.0:9187
# work_dir defaults to $HOME/.cache/clip-supervisor for a non-root user: in the container's
# own layer with plain `docker run`; the Kubernetes manifests put it on an emptyDir. Metrics
# listen on every address of the container (Prometheus scrapes it from outside); an
# environment variable wins over the config file, so change or empty it with -e / env.
USER 10001:10001
WORKDIR /var/lib/clip-supervisor
# ffmpeg's and ffprobe's start plans (worker/preload.py: their libraries preloaded so that
# the loader searches less), made here once instead of at every container start, where they
# cost ~2 s of CPU; kept in $HOME/.cache/clip-supervisor, outside the manifests' emptyDir.
RUN ["/opt/clip-supervisor/bin/python", "-c", \
     "from worker import preload; preload.prepare(['ffmpeg', 'ffprobe'])"]
EXPOSE 9187
# /healthz answers 200 while the master loop turns, Redis answers and no worker is paused by
# a fault of this host; with metrics off (CLIP_SUPERVISOR_METRICS_LISTEN empty) there is
# nothing to ask and the check passes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os,sys,urllib.request as u;l=os.environ.get('CLIP_SUPERVISOR_METRICS_LISTEN','');l or sys.exit(0);u.urlopen('http://127.0.0.1:%s/healthz'%l.rpartition(':')[2],timeout=4)"]
ENTRYPOINT ["clip-supervisor"]
CMD ["run"]
