# The station agent daemon on the local Debian base: configuration and station certificate in
# /etc/flashgate, journal and image cache in /var/lib/flashgate-agent.
FROM flashgate-base:bookworm
COPY flashgate /usr/local/bin/flashgate
RUN mkdir -p /var/lib/flashgate-agent /etc/flashgate
WORKDIR /var/lib/flashgate-agent
ENTRYPOINT ["/usr/local/bin/flashgate"]
CMD ["agent", "serve", "--config", "/etc/flashgate/agent.toml"]
