package main

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"os"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

var barColors = map[string]color.RGBA{
	"kernel":        {120, 120, 120, 255},
	"slirp4netns":   {230, 160, 40, 255},
	"pasta":         {70, 130, 200, 255},
	"gvproxy":       {170, 90, 190, 255},
	"msbtap":        {40, 170, 90, 255},
	"msbtap-fast":   {20, 110, 60, 255},
	"msbtap-b":      {150, 200, 90, 255},
	"msbtap-fast-b": {90, 140, 40, 255},
}

// writeChart draws one panel per figure: a bar per backend, scaled to the
// panel's largest value, with the values written above the bars.
func writeChart(rep *Report, path string) error {
	const pw, ph, cols = 360, 220, 4
	rows := (len(rep.Cells) + cols - 1) / cols
	img := image.NewRGBA(image.Rect(0, 0, pw*cols, ph*rows+40))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	text(img, 10, 20, color.Black, fmt.Sprintf("msbtap bench-peers %s (%s)", rep.Time, rep.Machine))
	lx := 10
	for _, b := range backends {
		fill(img, image.Rect(lx, 28, lx+10, 38), barColors[b])
		text(img, lx+14, 37, color.Black, b)
		lx += 20 + 7*len(b)
	}
	for i, c := range rep.Cells {
		x0, y0 := (i%cols)*pw, 40+(i/cols)*ph
		title := fmt.Sprintf("%s MTU %d (%s)", c.Metric, c.MTU, c.Unit)
		if c.Unit == "µs" {
			title = fmt.Sprintf("%s MTU %d (%s, lower is better)", c.Metric, c.MTU, c.Unit)
		}
		text(img, x0+10, y0+16, color.Black, title)
		max := 0.0
		for _, v := range c.Values {
			if v > max {
				max = v
			}
		}
		if max == 0 {
			continue
		}
		bw, base, height := 40, y0+ph-20, ph-60
		for j, b := range backends {
			v, ok := c.Values[b]
			if !ok {
				continue
			}
			h := int(v / max * float64(height))
			x := x0 + 15 + j*(bw+12)
			fill(img, image.Rect(x, base-h, x+bw, base), barColors[b])
			label := fmt.Sprintf("%.0f", v)
			if c.Unit == "Gbit/s" || c.Unit == "µs" {
				label = fmt.Sprintf("%.2f", v)
			}
			text(img, x, base-h-4, color.Black, label)
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return png.Encode(f, img)
}

func fill(img *image.RGBA, r image.Rectangle, c color.Color) {
	draw.Draw(img, r, &image.Uniform{C: c}, image.Point{}, draw.Src)
}

func text(img *image.RGBA, x, y int, c color.Color, s string) {
	d := font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}
