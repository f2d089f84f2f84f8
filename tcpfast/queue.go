package tcpfast

// connQueue is a queue of connections, oldest first: the ones lingering
// after their end (t.lingerq) and the ones whose host connect is under way
// (t.connq). Both drop entries from the front as they come to it; an entry
// that left its kind early stays until then, harmlessly.
type connQueue struct{ q []*conn }

func (q *connQueue) push(c *conn) { q.q = append(q.q, c) }

func (q *connQueue) len() int { return len(q.q) }

// popWhile takes connections off the front while pop says so (it may act
// on each: reset it, forget it) and stops at the first it refuses.
func (q *connQueue) popWhile(pop func(c *conn) bool) {
	for len(q.q) > 0 && pop(q.q[0]) {
		q.q[0] = nil
		q.q = q.q[1:]
	}
	if len(q.q) == 0 {
		q.q = nil // let the array go
	}
}

// keep drops every connection keep refuses, wherever it is.
func (q *connQueue) keep(keep func(c *conn) bool) {
	n := q.q[:0]
	for _, c := range q.q {
		if keep(c) {
			n = append(n, c)
		}
	}
	clear(q.q[len(n):])
	q.q = n
}
