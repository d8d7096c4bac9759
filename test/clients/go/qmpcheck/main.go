// qmpcheck drives a QMP server with go-qemu's qmp package (DigitalOcean's
// github.com/digitalocean/go-qemu/qmp), unchanged. Built offline in GOPATH
// mode against Debian's golang-github-digitalocean-go-qemu-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o qmpcheck .
//
// usage: qmpcheck unix PATH | qmpcheck tcp HOST:PORT
// Prints one JSON object with what it saw; exits 1 on a failure.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "qmpcheck: "+format+"\n", a...)
	os.Exit(1)
}

func run(mon *qmp.SocketMonitor, cmd string, args interface{}) map[string]interface{} {
	b, err := json.Marshal(qmp.Command{Execute: cmd, Args: args})
	if err != nil {
		fail("marshal: %v", err)
	}
	raw, err := mon.Run(b)
	if err != nil {
		fail("%s: %v", cmd, err)
	}
	var out map[string]interface{}
	if err := json.Unmarshal(raw, &out); err != nil {
		fail("%s: bad reply %q: %v", cmd, raw, err)
	}
	return out
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: qmpcheck unix|tcp ADDRESS")
	}
	mon, err := qmp.NewSocketMonitor(os.Args[1], os.Args[2], 5*time.Second)
	if err != nil {
		fail("dial: %v", err)
	}
	if err := mon.Connect(); err != nil {
		fail("connect/negotiate: %v", err)
	}
	defer mon.Disconnect()

	result := map[string]interface{}{
		"greeting_version": mon.Version.String(),
		"greeting_package": mon.Version.Package,
		"capabilities":     mon.Capabilities,
	}

	// go-qemu's event channel is unbuffered: drain it in the background
	events, err := mon.Events(context.Background())
	if err != nil {
		fail("events: %v", err)
	}
	got := make(chan qmp.Event, 16)
	go func() {
		for e := range events {
			got <- e
		}
	}()

	result["status0"] = run(mon, "query-status", nil)["return"].(map[string]interface{})["status"]
	result["version"] = run(mon, "query-version", nil)["return"]
	caps := run(mon, "query-migrate-capabilities", nil)["return"].([]interface{})
	result["migrate_capabilities"] = len(caps)

	run(mon, "stop", nil)
	result["status_stopped"] = run(mon, "query-status", nil)["return"].(map[string]interface{})["status"]
	run(mon, "cont", nil)
	result["status_resumed"] = run(mon, "query-status", nil)["return"].(map[string]interface{})["status"]

	var names []string
	timeout := time.After(5 * time.Second)
	for len(names) < 2 {
		select {
		case e := <-got:
			if e.Timestamp.Seconds <= 0 || e.Timestamp.Microseconds < 0 || e.Timestamp.Microseconds > 999999 {
				fail("bad timestamp on %s: %+v", e.Event, e.Timestamp)
			}
			names = append(names, e.Event)
		case <-timeout:
			fail("timed out waiting for STOP/RESUME, got %v", names)
		}
	}
	result["events"] = names

	// an error reply: go-qemu returns the desc as the error text
	b, _ := json.Marshal(qmp.Command{Execute: "no-such-command"})
	if _, err := mon.Run(b); err != nil {
		result["unknown_error"] = err.Error()
	} else {
		fail("no-such-command succeeded")
	}
	// arguments go through too
	b, _ = json.Marshal(qmp.Command{Execute: "migrate-set-capabilities", Args: map[string]interface{}{
		"capabilities": []map[string]interface{}{{"capability": "events", "state": true}},
	}})
	if _, err := mon.Run(b); err != nil {
		fail("migrate-set-capabilities: %v", err)
	}
	for _, c := range run(mon, "query-migrate-capabilities", nil)["return"].([]interface{}) {
		m := c.(map[string]interface{})
		if m["capability"] == "events" {
			result["events_capability"] = m["state"]
		}
	}

	out, _ := json.Marshal(result)
	fmt.Println(string(out))
}
