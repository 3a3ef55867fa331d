# The single-container deployment of the CodeHub gateway.
#
# Built without a registry: BASE_IMAGE is a locally made Debian bookworm image with
# python3 (scripts/build-base-image), and the Python wheels are built on the host into
# build/wheels (scripts/build-gateway-image does both, then checks `codehub --help`).
# The gateway reaches Docker through its socket, mounted at run time, and runs in the
# host's network namespace (the only one from which workspaces are reachable; it installs
# the firewall there, hence NET_ADMIN):
#   docker run -v /var/run/docker.sock:/var/run/docker.sock -v codehub-data:/data \
#     --network host --cap-add NET_ADMIN \
#     -e CODEHUB_DOCKER__GATEWAY_CONTAINER=codehub --name codehub IMAGE
ARG BASE_IMAGE
FROM ${BASE_IMAGE}

COPY build/wheels /tmp/wheels
# pip runs from its own wheel: the base image has python3 but no pip. The image holds
# one application, so it may install into the system interpreter.
RUN set -- /tmp/wheels/pip-*.whl \
    && python3 "$1/pip" install --no-index --find-links /tmp/wheels \
        --break-system-packages --no-compile --disable-pip-version-check codehub \
    && rm -rf /tmp/wheels

ENV CODEHUB_DATA_DIR=/data \
    CODEHUB_SERVER__HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 8000
STOPSIGNAL SIGTERM
ENTRYPOINT ["codehub"]
CMD ["serve"]
