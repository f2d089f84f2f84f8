// Package archtest holds one test and no code: it checks that the module's
// imports run one way, from the command line down to the leaves, against a
// table of layers written in the test. A new package must be given its
// layer there before the test passes.
package archtest
