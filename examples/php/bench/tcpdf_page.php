<?php
// A large application's start-up: TCPDF (Debian's php-tcpdf 6.6.2, tcpdf.php and its includes:
// 1.4 MB of PHP) makes a one-page PDF. Argument: the directory that holds tcpdf.php.
require $argv[1] . '/tcpdf.php';

$pdf = new TCPDF();
$pdf->SetCreator('wasmforge');
$pdf->setPrintHeader(false);
$pdf->setPrintFooter(false);
$pdf->AddPage();
$pdf->SetFont('helvetica', '', 12);
$pdf->Write(0, 'Hello from PHP on WASI');
$document = $pdf->Output('', 'S');
echo substr($document, 0, 5) === '%PDF-' && strlen($document) > 1000 ? "a PDF of one page\n" : "no PDF\n";
