# The licence broker on the local Debian base (no registry): configuration in /etc/flashgate,
# state (keystore, SQLite ledger, SoftHSM2 tokens) in /var/lib/flashgate.
FROM flashgate-base:bookworm
COPY flashgate /usr/local/bin/flashgate
RUN useradd --system --home /var/lib/flashgate flashgate && mkdir -p /var/lib/flashgate /etc/flashgate \
    && chown flashgate:flashgate /var/lib/flashgate
WORKDIR /var/lib/flashgate
EXPOSE 7443 9464
ENTRYPOINT ["/usr/local/bin/flashgate"]
CMD ["broker", "--config", "/etc/flashgate/broker.toml"]
