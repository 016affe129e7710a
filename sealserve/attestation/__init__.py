"""sealserve.attestation: verify attestation evidence (no grpc, no enclave code).

- ``claims``: Platform, Check, Claims, the Policy protocol
- ``snp``: the SEV-SNP report (SnpReport, TcbVersion, GuestPolicy, build_report)
- ``snp_certs``: cert table, AMD extensions, TrustedRoots (pinned AMD roots)
- ``snp_verify``: verify_snp_at_time / verify_snp -> Claims
- ``binding``: compute_report_data / verify_report_data_binding
- ``runtime_keys``: RuntimeKeys, the record of public keys made at first start (bound
  beside the manifest, so the manifest stays reproducible by ``sealserve measure``)
- ``evidence``: the Evidence wire object, verify_evidence_at_time / verify_evidence
- ``policy``: composable policies, DEFAULT_POLICY, the TOML policy file
"""
