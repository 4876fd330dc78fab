// Command etcd is etcd's own server, built from the Go module proxy: a wrapper module
// whose main calls etcdmain.Main (`go install` of etcd's command is refused because of
// the replace directives in its go.mod).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
