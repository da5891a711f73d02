# One image for every service of the mesh; the service is the command:
#   docker run IMAGE store --listen 0.0.0.0:7301 --data-dir /data
#   docker run IMAGE brain | hands | proxy | health ADDRESS | run "..." | sessions list
# compose.yaml wires the four services together. Build: docker build -t managed-agents .
FROM python:3.11-slim-bookworm

# bubblewrap: the hands' sandboxes; git: repositories cloned into sandboxes (through the relay);
# util-linux (nsenter, setpriv): the relay's door into a sandbox's network, and dropping to a sandbox's identity;
# mount, e2fsprogs: each sandbox's disk (a loop-mounted ext4 image); ca-certificates: HTTPS to Claude and MCP.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends bubblewrap git util-linux mount e2fsprogs ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/managed-agents
COPY pyproject.toml README.md ./
COPY managed_agents ./managed_agents
COPY session_store ./session_store
COPY brain ./brain
COPY hands ./hands
COPY mcp_proxy ./mcp_proxy
RUN pip install --no-cache-dir .

# Services log JSON lines to stderr and keep state only under the paths given by flags (volumes).
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["managed-agents"]
CMD ["--help"]
