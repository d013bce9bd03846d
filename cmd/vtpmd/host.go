package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/vtpmd/vtpmd/sealing/guardian/host"
)

const hostUsage = `Usage: vtpmd host identity [--config <guardian config>]

Prints this host's identity as the guardian registers it (JSON, for
'vtpmd guardian host add'): its TPM's EK and AK in TPM mode, its host key
(created on first use) in host-key mode. The guardian config is --config,
else $VTPMD_GUARDIAN_CONFIG, else /etc/vtpmd/guardian.json.
`

// runHost is `vtpmd host`: this host's side of the guardian.
func runHost(args []string, stdout io.Writer) error {
	if len(args) == 0 || args[0] != "identity" {
		fmt.Fprint(stdout, hostUsage)
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			return nil
		}
		return errors.New("host: give the command: identity")
	}
	var configFlag string
	var help bool
	err := parseArgs("host identity", args[1:], []flagSpec{
		{long: "config", takesValue: true, set: setString(&configFlag)},
		{long: "help", short: "h", set: setBool(&help)},
	})
	if err != nil {
		return err
	}
	if help {
		_, err := fmt.Fprint(stdout, hostUsage)
		return err
	}
	path, err := guardianConfig(configFlag)
	if err != nil {
		return err
	}
	if path == "" {
		return fmt.Errorf("host identity: no guardian config: give --config, set VTPMD_GUARDIAN_CONFIG or write %s", defaultGuardianConfig)
	}
	config, err := host.LoadConfig(path)
	if err != nil {
		return err
	}
	hostKey, err := guardianHostKeyPath()
	if err != nil {
		return err
	}
	id, err := config.Prover(hostKey).Identity()
	if err != nil {
		return fmt.Errorf("host identity: %w", err)
	}
	out, err := json.MarshalIndent(id, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "%s\n", out)
	return err
}
