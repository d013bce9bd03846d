package state

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

// BenchmarkDurablePut measures durable writes by 1, 16 and 64 VMs writing
// at once into one store: a delta of the size an NV counter's increment
// stores (about 200 bytes), and a whole sealed TPM image (about 16.5 KiB).
// Each Put returns only after its fsync; with more writers, pebble's group
// commit lets one fsync serve many, so writes/s grow with the number of VMs.
func BenchmarkDurablePut(b *testing.B) {
	for _, kind := range []struct {
		name  string
		size  int
		delta bool
	}{{"delta", 200, true}, {"whole", 16*1024 + 128, false}} {
		for _, vms := range []int{1, 16, 64} {
			b.Run(fmt.Sprintf("%s/vms=%d", kind.name, vms), func(b *testing.B) {
				s, err := Open(b.TempDir(), Options{})
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				sealed := make([]byte, kind.size)
				var next atomic.Int64
				b.ResetTimer()
				var wg sync.WaitGroup
				for vm := range vms {
					wg.Add(1)
					go func() {
						defer wg.Done()
						r := &Record{VMID: fmt.Sprintf("vm%d", vm), Sealed: sealed, Delta: kind.delta}
						for next.Add(1) <= int64(b.N) {
							r.Generation++
							if err := s.Put(r); err != nil {
								b.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "writes/s")
			})
		}
	}
}
